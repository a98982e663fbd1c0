/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Paging rights under 32-bit paging and under PAE paging, checked against the
 * hardware: like paging64, but the guest starts in 32-bit protected mode with paging
 * off and turns paging on itself, first with 32-bit tables, then with PAE tables (and
 * EFER.NXE for the XD bit). rvmm runs both on PAE shadows.
 */
	.intel_syntax noprefix
	.code32
	.text
	.globl _start

	.set PD32, 0x200000		/* 32-bit page directory */
	.set PT32A, 0x201000		/* identity 0..4 MiB */
	.set PT32B, 0x202000		/* the test page */
	.set PDPT, 0x206000		/* PAE */
	.set PDA, 0x207000		/* 0..1 GiB */
	.set PTA, 0x208000		/* identity 0..2 MiB */
	.set PDB, 0x209000		/* 1..2 GiB */
	.set PTB, 0x20a000		/* the test page */
	.set TESTVA, 0x40000000
	.set TESTPA, 0x300000
	.set IDT, 0x180000

_start:
	mov	esp, 0x1ff000
	/* IDT with a #PF gate (32-bit interrupt gate, CS 0x18). */
	lea	eax, pf_handler
	mov	edi, IDT + 14 * 8
	mov	word ptr [edi], ax
	mov	word ptr [edi + 2], 0x18
	mov	word ptr [edi + 4], 0x8e00
	shr	eax, 16
	mov	word ptr [edi + 6], ax
	lidt	idtr

	/* Clear the tables. */
	mov	edi, PD32
	mov	ecx, 11 * 4096 / 4
	xor	eax, eax
	rep	stosd
	/* 32-bit tables: 0..4 MiB identity (supervisor RW), TESTVA -> PT32B. */
	mov	dword ptr [PD32], PT32A | 3
	mov	dword ptr [PD32 + (TESTVA >> 22) * 4], PT32B | 7
	mov	edi, PT32A
	mov	eax, 3
	mov	ecx, 1024
1:	mov	[edi], eax
	add	eax, 0x1000
	add	edi, 4
	loop	1b
	/* PAE tables: 0..2 MiB identity by PTA, 2..4 MiB as a 2-MiB page, TESTVA -> PTB. */
	mov	dword ptr [PDPT], PDA | 1
	mov	dword ptr [PDPT + 8], PDB | 1
	mov	dword ptr [PDA], PTA | 3
	mov	dword ptr [PDA + 8], 0x200000 | 0x83
	mov	dword ptr [PDB], PTB | 7
	mov	edi, PTA
	mov	eax, 3
	mov	ecx, 512
2:	mov	[edi], eax
	mov	dword ptr [edi + 4], 0
	add	eax, 0x1000
	add	edi, 8
	loop	2b
	/* The test page: "jmp ebx" at offset 0, so a fetch comes back. */
	mov	word ptr [TESTPA], 0xe3ff

	mov	eax, 7
	xor	ecx, ecx
	cpuid
	shr	ebx, 7
	and	ebx, 1
	mov	have_smep, bl

	lea	esi, hdr
	call	puts

	/* Phase 1: 32-bit paging. */
	mov	byte ptr pae, 0
	mov	eax, PD32
	mov	cr3, eax
	mov	eax, cr0
	or	eax, 1 << 31
	mov	cr0, eax
	lea	esi, s_mode32
	call	puts
	call	all_cases

	/* Phase 2: PAE paging with EFER.NXE. */
	mov	eax, cr0
	and	eax, ~(1 << 31)
	mov	cr0, eax
	mov	eax, cr4
	or	eax, 1 << 5
	mov	cr4, eax
	mov	ecx, 0xc0000080
	rdmsr
	or	eax, 1 << 11
	wrmsr
	mov	byte ptr pae, 1
	mov	eax, PDPT
	mov	cr3, eax
	mov	eax, cr0
	or	eax, 1 << 31
	mov	cr0, eax
	lea	esi, s_modepae
	call	puts
	call	all_cases

	mov	al, 0x12
	out	0xf4, al
	hlt

/* Every case of the current paging mode: WP x SMEP x leaf flags x access. */
all_cases:
	mov	byte ptr env, 0
3:	cmp	byte ptr env, 4
	je	9f
	test	byte ptr env, 2
	jz	4f
	cmp	byte ptr have_smep, 0
	je	8f
4:	mov	eax, cr0
	and	eax, ~(1 << 16)
	test	byte ptr env, 1
	jz	5f
	or	eax, 1 << 16
5:	mov	cr0, eax
	mov	eax, cr4
	and	eax, ~(1 << 20)
	test	byte ptr env, 2
	jz	6f
	or	eax, 1 << 20
6:	mov	cr4, eax
	mov	byte ptr flags, 0
7:	call	one_line
	inc	byte ptr flags
	mov	al, 8
	cmp	byte ptr pae, 0
	jne	10f
	mov	al, 4			/* no XD without PAE */
10:	cmp	flags, al
	jne	7b
8:	inc	byte ptr env
	jmp	3b
9:	/* Not present. */
	lea	esi, s_np
	call	puts
	mov	byte ptr acc, 0
11:	xor	eax, eax
	call	set_pte_raw
	call	access
	mov	al, ' '
	call	putc
	call	print_result
	inc	byte ptr acc
	cmp	byte ptr acc, 3
	jne	11b
	mov	al, '\n'
	jmp	putc

one_line:
	lea	esi, s_wp
	call	puts
	mov	al, env
	and	al, 1
	call	putdigit
	lea	esi, s_smep
	call	puts
	mov	al, env
	shr	al, 1
	call	putdigit
	lea	esi, s_flags
	call	puts
	mov	al, flags
	and	al, 1
	call	putdigit
	mov	al, flags
	shr	al, 1
	and	al, 1
	call	putdigit
	mov	al, flags
	shr	al, 2
	call	putdigit
	mov	byte ptr acc, 0
12:	mov	eax, TESTPA | 1
	test	byte ptr flags, 1
	jz	13f
	or	eax, 4
13:	test	byte ptr flags, 2
	jz	14f
	or	eax, 2
14:	call	set_pte_raw
	mov	al, ' '
	call	putc
	call	access
	call	print_result
	inc	byte ptr acc
	cmp	byte ptr acc, 3
	jne	12b
	mov	al, '\n'
	jmp	putc

/* set_pte_raw: the test PTE = eax (low word), with XD from flags bit 2 under PAE. */
set_pte_raw:
	cmp	byte ptr pae, 0
	jne	15f
	mov	[PT32B], eax
	jmp	16f
15:	mov	[PTB], eax
	mov	dword ptr [PTB + 4], 0
	test	eax, eax
	jz	16f
	test	byte ptr flags, 4
	jz	16f
	mov	dword ptr [PTB + 4], 0x80000000
16:	mov	edi, TESTVA
	invlpg	[edi]
	ret

get_pte:
	mov	eax, [PT32B]
	cmp	byte ptr pae, 0
	je	17f
	mov	eax, [PTB]
17:	ret

access:
	mov	byte ptr faulted, 0
	mov	edi, TESTVA
	cmp	byte ptr acc, 1
	je	18f
	ja	19f
	.byte	0x8a, 0x07		/* mov al, [edi] */
	ret
18:	mov	al, 0xff
	.byte	0x88, 0x07		/* mov [edi], al: keeps the "jmp ebx" */
	ret
19:	lea	ebx, 20f
	jmp	edi
20:	ret

print_result:
	cmp	byte ptr faulted, 0
	jne	21f
	mov	al, '-'
	call	putc
	call	putc
	jmp	22f
21:	mov	eax, last_ec
	shr	al, 4
	call	puthex
	mov	eax, last_ec
	and	al, 0xf
	call	puthex
22:	mov	al, '/'
	call	putc
	call	get_pte
	shr	eax, 5
	and	al, 3
	call	putdigit
	ret

pf_handler:
	push	eax
	mov	eax, [esp + 4]
	mov	last_ec, eax
	mov	byte ptr faulted, 1
	mov	eax, cr2
	cmp	eax, [esp + 8]		/* CR2 == EIP: the fetch faulted */
	jne	23f
	mov	[esp + 8], ebx		/* resume where the fetch would have returned */
	jmp	24f
23:	add	dword ptr [esp + 8], 2
24:	pop	eax
	add	esp, 4
	iretd

putdigit:
	add	al, '0'
	jmp	putc
puthex:
	cmp	al, 10
	jb	putdigit
	add	al, 'a' - 10
putc:
	push	edx
	mov	dx, 0x3f8
	out	dx, al
	pop	edx
	ret
puts:
	push	eax
25:	lodsb
	test	al, al
	jz	26f
	call	putc
	jmp	25b
26:	pop	eax
	ret

	.data
idtr:	.word	256 * 8 - 1
	.long	IDT
faulted: .byte	0
have_smep: .byte 0
pae:	.byte	0
env:	.byte	0
flags:	.byte	0
acc:	.byte	0
	.balign	4
last_ec: .long	0
hdr:	.asciz	"paging32: read write fetch from ring 0; error code or --, then PTE A/D\n"
s_mode32: .asciz "32-bit paging\n"
s_modepae: .asciz "PAE paging\n"
s_wp:	.asciz	"wp="
s_smep:	.asciz	" smep="
s_flags: .asciz	" us,rw,xd="
s_np:	.asciz	"not present:"
