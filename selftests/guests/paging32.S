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
	.set UCODE, 0x1c0000		/* user code page (ring-3 cases) */
	.set USTACK, 0x1c1000		/* user stack page */

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
	/* Ring 3: our GDT with user segments and a TSS, an INT 0x80 gate (DPL 3), the
	 * user code, and user entries for its page and the user stack in both tables. */
	lea	eax, tss
	mov	word ptr [gdt_tss + 2], ax
	shr	eax, 16
	mov	byte ptr [gdt_tss + 4], al
	mov	byte ptr [gdt_tss + 7], ah
	lgdt	gdtr
	ljmp	0x18, offset 36f
36:	mov	ax, 0x30
	ltr	ax
	lea	eax, int80
	mov	edi, IDT + 0x80 * 8
	mov	word ptr [edi], ax
	mov	word ptr [edi + 2], 0x18
	mov	word ptr [edi + 4], 0xee00
	shr	eax, 16
	mov	word ptr [edi + 6], ax
	lea	esi, ucode
	mov	edi, UCODE
	mov	ecx, ucode_end - ucode
	rep	movsb
	mov	dword ptr [PD32], PT32A | 7
	mov	dword ptr [PT32A + (UCODE >> 12) * 4], UCODE | 7
	mov	dword ptr [PT32A + (USTACK >> 12) * 4], USTACK | 7
	mov	dword ptr [PDA], PTA | 7
	mov	dword ptr [PTA + (UCODE >> 12) * 8], UCODE | 7
	mov	dword ptr [PTA + (USTACK >> 12) * 8], USTACK | 7
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
	call	putc
	jmp	ring3_cases

/*
 * The same accesses from ring 3: user-accessible tables down to a user code page and a
 * user stack page, IRETD to ring 3, INT 0x80 back (GDT and TSS set up in _start).
 */
ring3_cases:
	mov	eax, cr0
	and	eax, ~(1 << 16)
	mov	cr0, eax
	mov	eax, cr4
	and	eax, ~(1 << 20)
	mov	cr4, eax
	mov	byte ptr flags, 0
27:	lea	esi, s_cpl3
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
28:	mov	eax, TESTPA | 1
	test	byte ptr flags, 1
	jz	29f
	or	eax, 4
29:	test	byte ptr flags, 2
	jz	30f
	or	eax, 2
30:	call	set_pte_raw
	mov	al, ' '
	call	putc
	mov	byte ptr faulted, 0
	call	user_access
	call	print_result
	inc	byte ptr acc
	cmp	byte ptr acc, 3
	jne	28b
	mov	al, '\n'
	call	putc
	inc	byte ptr flags
	mov	al, 8
	cmp	byte ptr pae, 0
	jne	31f
	mov	al, 4
31:	cmp	flags, al
	jne	27b
	ret

/* user_access: access `acc` of TESTVA from ring 3; returns here through INT 0x80. */
user_access:
	mov	ksp, esp
	movzx	ecx, byte ptr acc
	mov	edi, TESTVA
	push	0x2b			/* SS: user data, RPL 3 */
	push	USTACK + 0x1000
	push	0x2			/* EFLAGS: interrupts off */
	push	0x23			/* CS: user code, RPL 3 */
	push	UCODE
	iretd
int80:
	mov	esp, ksp
	mov	ax, 0x10
	mov	ds, ax
	mov	es, ax
	ret

/* Copied to UCODE; position independent. ECX: 0 read, 1 write, 2 fetch. */
ucode:
	mov	ax, 0x2b
	mov	ds, ax
	mov	es, ax
	cmp	ecx, 1
	je	32f
	ja	33f
	.byte	0x8a, 0x07		/* mov al, [edi] */
	int	0x80
32:	mov	al, 0xff
	.byte	0x88, 0x07		/* mov [edi], al */
	int	0x80
33:	call	34f
34:	pop	ebx
	add	ebx, 35f - 34b		/* where "jmp ebx" in the test page returns */
	jmp	edi
35:	int	0x80
ucode_end:

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
s_cpl3:	.asciz	"cpl=3 us,rw,xd="
	.balign	4
ksp:	.long	0
gdt:	.quad	0
	.quad	0			/* 0x08 unused */
	.quad	0x00cf92000000ffff	/* 0x10 kernel data */
	.quad	0x00cf9a000000ffff	/* 0x18 kernel code */
	.quad	0x00cffa000000ffff	/* 0x20 user code */
	.quad	0x00cff2000000ffff	/* 0x28 user data */
gdt_tss: .quad	0x0000890000000067	/* 0x30 TSS (base filled in) */
gdt_end:
gdtr:	.word	gdt_end - gdt - 1
	.long	gdt
	.balign	16
tss:	.long	0
	.long	0x1f0000		/* ESP0 */
	.long	0x10			/* SS0 */
	.space	104 - 12
