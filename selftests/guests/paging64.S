/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Paging rights, checked against the hardware: a 64-bit guest builds its own 4-level
 * tables, maps one test page with every combination of U/S, R/W and XD in the leaf,
 * under CR0.WP = 0/1 and CR4.SMEP = 0/1, reads, writes and executes it from ring 0,
 * and prints, per case, the #PF error code it got ("--" for none) and the accessed and
 * dirty flags the walk left in the PTE. The same image runs on KVM (real paging) and on
 * rvmm (shadow paging): the outputs must be equal.
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start

	.set TABLES, 0x200000		/* PML4, PDPT, PD, PT0, PT1 at 0x200000.. */
	.set PML4, TABLES
	.set PDPT, TABLES + 0x1000
	.set PD, TABLES + 0x2000
	.set PT0, TABLES + 0x3000	/* identity map of 0..2 MiB */
	.set PT1, TABLES + 0x4000	/* the test page */
	.set PD1, TABLES + 0x5000	/* PD for 1 GiB.. */
	.set TESTVA, 0x40000000
	.set TESTPA, 0x300000
	.set IDT, 0x180000

_start:
	/* A stack inside what our own tables map. */
	mov	rsp, 0x1ff000
	/* IDT with a #PF gate. */
	lea	rax, [rip + pf_handler]
	mov	rdi, IDT + 14 * 16
	mov	word ptr [rdi], ax
	mov	word ptr [rdi + 2], 0x8
	mov	word ptr [rdi + 4], 0x8e00
	shr	rax, 16
	mov	word ptr [rdi + 6], ax
	shr	rax, 16
	mov	dword ptr [rdi + 8], eax
	mov	dword ptr [rdi + 12], 0
	lea	rax, [rip + idtr]
	lidt	[rax]

	/* Tables: 0..2 MiB identity (4 KiB pages, supervisor RW), TESTVA -> TESTPA, plus
	 * 2..4 MiB identity for the tables themselves and the test page's frame. */
	mov	rdi, TABLES
	mov	ecx, 6 * 4096 / 8
	xor	eax, eax
	rep	stosq
	mov	qword ptr [PML4], PDPT | 7
	mov	qword ptr [PDPT], PD | 3
	mov	qword ptr [PDPT + 8], PD1 | 7
	mov	qword ptr [PD], PT0 | 3
	mov	qword ptr [PD + 8], 0x200000 | 0x83	/* 2 MiB page at 2 MiB */
	mov	qword ptr [PD1], PT1 | 7
	mov	rdi, PT0
	mov	rax, 3
	mov	ecx, 512
1:	mov	[rdi], rax
	add	rax, 0x1000
	add	rdi, 8
	loop	1b
	/* The test page holds RET at offset 0. */
	mov	byte ptr [TESTPA], 0xc3

	/* EFER.NXE on, then our tables. */
	mov	ecx, 0xc0000080
	rdmsr
	or	eax, 1 << 11
	wrmsr
	mov	rax, PML4
	mov	cr3, rax

	lea	rsi, [rip + hdr]
	call	puts

	/* SMEP available? (CPUID.7.0:EBX[7]) */
	mov	eax, 7
	xor	ecx, ecx
	cpuid
	shr	ebx, 7
	and	ebx, 1
	mov	[rip + have_smep], bl
	/* Leave no other CPUID value in the final state (compared across CPU models). */
	xor	edx, edx
	xor	ecx, ecx

	xor	r12, r12		/* r12: bit 0 = WP, bit 1 = SMEP */
case_env:
	cmp	r12, 4
	je	not_present
	test	r12, 2
	jz	2f
	cmp	byte ptr [rip + have_smep], 0
	je	next_env
2:	mov	rax, cr0
	and	rax, ~(1 << 16)
	test	r12, 1
	jz	3f
	or	rax, 1 << 16
3:	mov	cr0, rax
	mov	rax, cr4
	and	rax, ~(1 << 20)
	test	r12, 2
	jz	4f
	or	rax, 1 << 20
4:	mov	cr4, rax

	xor	r13, r13		/* r13: bit 0 = U/S, bit 1 = R/W, bit 2 = XD */
case_flags:
	lea	rsi, [rip + s_wp]
	call	puts
	mov	al, r12b
	and	al, 1
	call	putdigit
	lea	rsi, [rip + s_smep]
	call	puts
	mov	al, r12b
	shr	al, 1
	call	putdigit
	lea	rsi, [rip + s_flags]
	call	puts
	mov	al, r13b
	and	al, 1
	call	putdigit
	mov	al, r13b
	shr	al, 1
	and	al, 1
	call	putdigit
	mov	al, r13b
	shr	al, 2
	call	putdigit

	xor	r14, r14		/* r14: 0 read, 1 write, 2 fetch */
case_access:
	/* PTE = TESTPA | P | U/S | R/W | XD, accessed/dirty clear. */
	mov	rax, TESTPA | 1
	test	r13, 1
	jz	5f
	or	rax, 4
5:	test	r13, 2
	jz	6f
	or	rax, 2
6:	test	r13, 4
	jz	7f
	bts	rax, 63
7:	mov	[PT1], rax
	mov	rdi, TESTVA
	invlpg	[rdi]
	call	access
	mov	al, ' '
	call	putc
	call	print_result
	inc	r14
	cmp	r14, 3
	jne	case_access
	mov	al, '\n'
	call	putc
	inc	r13
	cmp	r13, 8
	jne	case_flags
next_env:
	inc	r12
	jmp	case_env

not_present:
	/* A not-present PTE, for each access. */
	lea	rsi, [rip + s_np]
	call	puts
	xor	r14, r14
8:	mov	qword ptr [PT1], 0
	mov	rdi, TESTVA
	invlpg	[rdi]
	call	access
	mov	al, ' '
	call	putc
	call	print_result
	inc	r14
	cmp	r14, 3
	jne	8b
	mov	al, '\n'
	call	putc
	call	ring3_cases
	mov	al, 0x10
	out	0xf4, al
	hlt

/*
 * The same accesses from ring 3 (WP and SMEP do not apply there): our own GDT with user
 * segments and a TSS, user-accessible tables down to a user code page and a user stack
 * page, IRETQ to ring 3, and INT 0x80 back to ring 0.
 */
	.set UCODE, 0x1c0000
	.set USTACK, 0x1c1000
	.set RSP0, 0x1f0000
ring3_cases:
	/* WP and SMEP back to 0 (they do not matter for user accesses). */
	mov	rax, cr0
	and	rax, ~(1 << 16)
	mov	cr0, rax
	mov	rax, cr4
	and	rax, ~(1 << 20)
	mov	cr4, rax
	/* GDT: TSS descriptor base, then load GDT, segments and TR. */
	lea	rax, [rip + tss]
	mov	word ptr [rip + gdt_tss + 2], ax
	shr	rax, 16
	mov	byte ptr [rip + gdt_tss + 4], al
	mov	byte ptr [rip + gdt_tss + 7], ah
	shr	rax, 16
	mov	dword ptr [rip + gdt_tss + 8], eax
	lea	rax, [rip + gdtr]
	lgdt	[rax]
	lea	rax, [rip + 17f]
	push	0x8
	push	rax
	retfq
17:	mov	ax, 0x10
	mov	ds, ax
	mov	es, ax
	mov	ss, ax
	mov	ax, 0x28
	ltr	ax
	/* INT 0x80 gate, DPL 3. */
	lea	rax, [rip + int80]
	mov	rdi, IDT + 0x80 * 16
	mov	word ptr [rdi], ax
	mov	word ptr [rdi + 2], 0x8
	mov	word ptr [rdi + 4], 0xee00
	shr	rax, 16
	mov	word ptr [rdi + 6], ax
	shr	rax, 16
	mov	dword ptr [rdi + 8], eax
	mov	dword ptr [rdi + 12], 0
	/* User code: the three accesses, each followed by INT 0x80. */
	lea	rsi, [rip + ucode]
	mov	rdi, UCODE
	mov	ecx, ucode_end - ucode
	rep	movsb
	/* User paths: PDPT and PD entries already carry U/S; PT0 entries for the user
	 * code and stack pages. */
	mov	qword ptr [PDPT], PD | 7
	mov	qword ptr [PD], PT0 | 7
	mov	qword ptr [PT0 + (UCODE >> 12) * 8], UCODE | 7
	mov	qword ptr [PT0 + (USTACK >> 12) * 8], USTACK | 7
	mov	rax, cr3
	mov	cr3, rax
	xor	r13, r13
18:	lea	rsi, [rip + s_cpl3]
	call	puts
	mov	al, r13b
	and	al, 1
	call	putdigit
	mov	al, r13b
	shr	al, 1
	and	al, 1
	call	putdigit
	mov	al, r13b
	shr	al, 2
	call	putdigit
	xor	r14, r14
19:	mov	rax, TESTPA | 1
	test	r13, 1
	jz	20f
	or	rax, 4
20:	test	r13, 2
	jz	21f
	or	rax, 2
21:	test	r13, 4
	jz	22f
	bts	rax, 63
22:	mov	[PT1], rax
	mov	rdi, TESTVA
	invlpg	[rdi]
	mov	byte ptr [rip + faulted], 0
	call	user_access
	mov	al, ' '
	call	putc
	call	print_result
	inc	r14
	cmp	r14, 3
	jne	19b
	mov	al, '\n'
	call	putc
	inc	r13
	cmp	r13, 8
	jne	18b
	ret

/* user_access: runs the user code (access r14 of [rdi]) in ring 3; returns here. */
user_access:
	mov	[rip + ksp], rsp
	push	0x1b			/* SS: user data, RPL 3 */
	push	USTACK + 0x1000
	push	0x2			/* RFLAGS: interrupts off */
	push	0x23			/* CS: user code, RPL 3 */
	push	UCODE
	iretq
int80:
	mov	rsp, [rip + ksp]
	mov	ax, 0x10
	mov	ds, ax
	mov	es, ax
	ret

/* Copied to UCODE; position independent. */
ucode:
	cmp	r14, 1
	je	23f
	ja	24f
	.byte	0x8a, 0x07		/* mov al, [rdi] */
	int	0x80
23:	mov	al, 0xc3
	.byte	0x88, 0x07		/* mov [rdi], al */
	int	0x80
24:	call	rdi
	int	0x80
ucode_end:

/* access: r14 selects read, write or fetch of [rdi]; sets faulted/last_ec. */
access:
	mov	byte ptr [rip + faulted], 0
	cmp	r14, 1
	je	9f
	ja	10f
	.byte	0x8a, 0x07		/* mov al, [rdi] (2 bytes) */
	ret
9:	mov	al, 0xc3
	.byte	0x88, 0x07		/* mov [rdi], al (2 bytes) */
	ret
10:	call	rdi
	ret

/* print_result: "--" or the error code in hex, then A/D of the PTE as a digit. */
print_result:
	cmp	byte ptr [rip + faulted], 0
	jne	11f
	mov	al, '-'
	call	putc
	call	putc
	jmp	12f
11:	mov	rax, [rip + last_ec]
	shr	al, 4
	call	puthex
	mov	rax, [rip + last_ec]
	and	al, 0xf
	call	puthex
12:	mov	al, '/'
	call	putc
	mov	rax, [PT1]
	shr	rax, 5
	and	al, 3
	call	putdigit
	ret

pf_handler:
	push	rax
	push	rbx
	mov	rax, cr2
	mov	[rip + last_cr2], rax
	mov	rbx, [rsp + 16]
	mov	[rip + last_ec], rbx
	mov	byte ptr [rip + faulted], 1
	cmp	rax, [rsp + 24]		/* CR2 == RIP: the fetch itself faulted */
	jne	13f
	mov	rbx, [rsp + 48]		/* emulate the RET of the target */
	mov	rax, [rbx]
	mov	[rsp + 24], rax
	add	qword ptr [rsp + 48], 8
	jmp	14f
13:	add	qword ptr [rsp + 24], 2	/* skip the 2-byte data access */
14:	pop	rbx
	pop	rax
	add	rsp, 8
	iretq

putdigit:
	add	al, '0'
	jmp	putc
puthex:
	cmp	al, 10
	jb	putdigit
	add	al, 'a' - 10
putc:
	push	rdx
	mov	dx, 0x3f8
	out	dx, al
	pop	rdx
	ret
puts:
	push	rax
15:	lodsb
	test	al, al
	jz	16f
	call	putc
	jmp	15b
16:	pop	rax
	ret

	.data
idtr:	.word	256 * 16 - 1
	.quad	IDT
faulted: .byte	0
have_smep: .byte 0
	.balign	8
last_ec: .quad	0
last_cr2: .quad	0
hdr:	.asciz	"paging64: read write fetch from ring 0; error code or --, then PTE A/D\n"
s_wp:	.asciz	"wp="
s_smep:	.asciz	" smep="
s_flags: .asciz	" us,rw,xd="
s_np:	.asciz	"not present:"
s_cpl3:	.asciz	"cpl=3 us,rw,xd="
	.balign	8
ksp:	.quad	0
gdt:	.quad	0
	.quad	0x00af9a000000ffff	/* 0x08 kernel code */
	.quad	0x00cf92000000ffff	/* 0x10 kernel data */
	.quad	0x00cff2000000ffff	/* 0x18 user data */
	.quad	0x00affa000000ffff	/* 0x20 user code */
gdt_tss: .quad	0x0000890000000067	/* 0x28 TSS (base filled in) */
	.quad	0
gdt_end:
gdtr:	.word	gdt_end - gdt - 1
	.quad	gdt
	.balign	16
tss:	.long	0
	.quad	RSP0			/* RSP0 */
	.space	104 - 12
